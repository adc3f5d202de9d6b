"""TCFL trainer, train.py and evaluate.py --epoch: tiny images, a few steps, never real training."""
import csv
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluate
import models
import scoring
import synthetic
import train
import trainers
import utils
from utils import DataError

SHIPPED = Path(__file__).resolve().parents[1] / "ckpt" / "tcfl_duke28_G.pth"


def triplet(batch=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 1, size, size, generator=g) for _ in range(3)]


@pytest.fixture
def make_trainer(trainer_args):
    """TCFLTrainer(trainer_args(**overrides), generator=..., discriminator=...), seeded."""
    def make(generator=None, discriminator=None, **overrides):
        torch.manual_seed(0)
        return trainers.TCFLTrainer(trainer_args(**overrides), generator=generator, discriminator=discriminator)
    return make


class ConstantNoise(nn.Module):
    def __init__(self):
        super().__init__()
        self.value = nn.Parameter(torch.full((1, 1, 1, 1), 0.1))

    def forward(self, x):
        return self.value.expand_as(x)


class BlurResidual(nn.Module):
    """A crude but input-dependent denoiser without BatchNorm: noise = x - blur(x)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.scale * (x - F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False))


class KnownCritic(nn.Module):
    """A D whose scores are known: a learnable scalar plus each image's mean, expanded to the PatchGAN's
    output shape (N, 1, H / 16, W / 16). `seen` records every batch it scores."""

    def __init__(self, value=0.3):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(value))
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return (self.value + x.mean(dim=(1, 2, 3))).view(-1, 1, 1, 1).expand(-1, 1, x.shape[-2] // 16, x.shape[-1] // 16)


def six_separate_calls(G, a, b, c):
    """The published flow, one G call per image set: [C_A1, C_B1, C_A2, C_B2, C_C1, C_C2]."""
    n_a, n_b = G(a), G(b)
    c_a1, c_b1 = a - n_a, b - n_b
    i_a2, i_b2, i_c1, i_c2 = c_a1 + n_b, c_b1 + n_a, c + n_a, c + n_b
    return [c_a1, c_b1, i_a2 - G(i_a2), i_b2 - G(i_b2), i_c1 - G(i_c1), i_c2 - G(i_c2)]


# ------------------------------------------------------------------ the flow

def test_batched_flow_equals_six_separate_calls(make_trainer):
    """With --frozen_bn, BN uses its running statistics, so batching cannot change G's output."""
    trainer = make_trainer(frozen_bn=True, zero_mean=False, g_calls="batched")
    trainer.train_mode()
    a, b, c = triplet()
    with torch.no_grad():
        fakes, (noise_a, noise_b) = trainer.fuse(a, b, c)
        expected = six_separate_calls(trainer.model, a, b, c)
        for got, want in zip(fakes, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # D once on the six concatenated fakes == the sum of six per-fake LSGAN losses.
        batched = 6 * trainers.gan_loss(trainer.D(torch.cat(fakes)), True, "lsgan")
        separate = sum(trainers.gan_loss(trainer.D(f), True, "lsgan") for f in expected)
        torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-6)


def test_batched_flow_in_train_mode_equals_separate_calls_only_without_batchnorm(make_trainer):
    """The default (no --frozen_bn): G trains with BatchNorm on batch statistics, and the batched flow (G on
    [I_A; I_B], then on the four stage-2 sets together) normalises over other images than separate calls
    do, so every output differs, in each stage on its own: measured 0.08 (C_A1, C_B1) and 0.17 to 0.38 (stage 2,
    given the same stage-2 inputs) for the untrained DnCNN on these crops (images in [0, 1]). A BN-free
    generator gives the same six estimates either way."""
    a, b, c = triplet()
    trainer = make_trainer(zero_mean=False, g_calls="batched")
    trainer.train_mode()
    assert any(isinstance(m, nn.BatchNorm2d) and m.training for m in trainer.model.modules())
    G = trainer.model
    with torch.no_grad():
        fakes, (noise_a, noise_b) = trainer.fuse(a, b, c)
        stage1 = [a - G(a), b - G(b)]  # one call per image set
        stage2 = [x - G(x) for x in (fakes[0] + noise_b, fakes[1] + noise_a, c + noise_a, c + noise_b)]  # same inputs
    differences = [(x - y).abs().max().item() for x, y in zip(fakes, stage1 + stage2)]
    assert min(differences) > 0.02, differences

    trainer = make_trainer(generator=BlurResidual(), zero_mean=False, g_calls="batched")
    trainer.train_mode()
    with torch.no_grad():
        fakes, _ = trainer.fuse(a, b, c)
        for got, want in zip(fakes, six_separate_calls(trainer.model, a, b, c)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_per_estimate_flow_equals_six_separate_calls_with_batchnorm_training(make_trainer):
    """--g_calls per_estimate calls G once per estimate, so BatchNorm's batch statistics are those
    of the published flow's six calls, without --frozen_bn."""
    trainer = make_trainer(zero_mean=False, g_calls="per_estimate")
    trainer.train_mode()
    a, b, c = triplet()
    with torch.no_grad():
        fakes, _ = trainer.fuse(a, b, c)
        for got, want in zip(fakes, six_separate_calls(trainer.model, a, b, c)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def plain_published_step(trainer, a, b, c):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from train_speed import naive_step
    return naive_step(trainer, a, b, c)


def assert_same_gradients(fast, reference, tolerance):
    """The two trainers' gradients after one step, via Adam's first moment (0.5 x the gradient); not the
    weights: Adam's first step is +-lr wherever a gradient is nonzero, so an element whose gradient is
    zero up to rounding (e.g. D's conv biases before InstanceNorm) may step either way."""
    for optimizer in ("opt_g", "opt_d"):
        got, expected = ([state["exp_avg"] for state in getattr(trainer, optimizer).state.values()] for trainer in (fast, reference))
        scale = max(e.abs().max().item() for e in expected)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=tolerance * scale)


@pytest.mark.parametrize("channels_last", [False, True])
def test_per_estimate_step_equals_the_plain_published_step(make_trainer, channels_last):
    """--g_calls per_estimate (six G calls, D on all fakes at once without its weight gradients in G's
    update) is a rescheduling of bench/train_speed.py's plain flow: same losses and gradients, to float
    rounding. channels_last runs other oneDNN kernels, which round differently (the six estimates
    differ by ~1e-5); the identity losses' residuals are small, so that shows as ~0.5% in G's
    gradients (measured), where the same kernels agree to ~1e-6."""
    a, b, c = triplet(size=32)
    reference = make_trainer(g_calls="per_estimate", channels_last=False)
    fast = make_trainer(g_calls="per_estimate", channels_last=channels_last)
    assert fast.model.body[2].weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    want = plain_published_step(reference, a, b, c)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    stats = fast.step(*(t.contiguous(memory_format=layout) for t in (a, b, c)))
    assert stats["loss_g"] == pytest.approx(want[0], abs=1e-5) and stats["loss_d"] == pytest.approx(want[1], abs=1e-5)
    assert_same_gradients(fast, reference, 2e-2 if channels_last else 1e-4)


def test_channels_last_step_equals_the_default_layout_step(make_trainer):
    """The CPU default (batched G calls in channels_last memory) against the same flow in the default
    memory layout: same losses to 1e-5, gradients to rounding (see the test above)."""
    a, b, c = triplet(size=32)
    reference, fast = make_trainer(channels_last=False), make_trainer(channels_last=True)
    want = reference.step(a, b, c)
    stats = fast.step(*(t.contiguous(memory_format=torch.channels_last) for t in (a, b, c)))
    assert stats["loss_g"] == pytest.approx(want["loss_g"], abs=1e-5) and stats["loss_d"] == pytest.approx(want["loss_d"], abs=1e-5)
    assert_same_gradients(fast, reference, 2e-2)


def test_bf16_step_stays_near_the_fp32_step(make_trainer):
    """--precision bf16 (auto's choice on CPUs with AVX512-BF16 / AMX): one training step runs under autocast
    and its losses are the fp32 step's to bf16 rounding, its gradients point the same way."""
    a, b, c = triplet(size=32)
    reference, fast = make_trainer(precision="fp32"), make_trainer(precision="bf16")
    assert fast.args.bf16 and not reference.args.bf16
    want, stats = reference.step(a, b, c), fast.step(a, b, c)
    assert stats["loss_g"] == pytest.approx(want["loss_g"], rel=2e-2) and stats["loss_d"] == pytest.approx(want["loss_d"], rel=2e-2)
    assert stats["loss_g"] != want["loss_g"]  # bf16 was on
    for optimizer in ("opt_g", "opt_d"):  # element-wise, bf16 moves near-cancelling gradients a lot: compare directions
        got, expected = (torch.cat([state["exp_avg"].flatten() for state in getattr(trainer, optimizer).state.values()])
                         for trainer in (fast, reference))
        assert F.cosine_similarity(got, expected, dim=0) > 0.8


def test_machine_options_resolve_per_device(trainer_args, monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(utils, "bf16_is_native", lambda device: False)
    auto = trainers.resolve_for_device(trainer_args(), cpu)
    assert (auto.channels_last, auto.bf16) == (True, False)
    assert not trainers.resolve_for_device(trainer_args(), cuda).channels_last
    assert trainers.resolve_for_device(trainer_args(precision="bf16"), cpu).bf16
    assert not trainers.resolve_for_device(trainer_args(channels_last=False), cpu).channels_last
    monkeypatch.setattr(utils, "bf16_is_native", lambda device: True)
    assert trainers.resolve_for_device(trainer_args(), cpu).bf16
    assert not trainers.resolve_for_device(trainer_args(precision="fp32"), cpu).bf16


def test_noise_scale_rescales_the_noise_that_p2p_and_c2p_add_back(make_trainer):
    trainer = make_trainer(noise_scale=[2.0, 2.0], zero_mean=False)
    seen = []
    real_noise = trainer.noise
    trainer.noise = lambda images, estimates: seen.append(images) or real_noise(images, estimates)
    a, b, c = triplet()
    with torch.no_grad():
        trainer.fuse(a, b, c)
        noise_a, noise_b = real_noise(torch.cat([a, b]), 2).chunk(2)
    stage2 = torch.cat([a - noise_a + 2 * noise_b, b - noise_b + 2 * noise_a, c + 2 * noise_a, c + 2 * noise_b])
    torch.testing.assert_close(seen[1], stage2)
    drawn = make_trainer(noise_scale=[0.25, 1.5]).noise_scales(torch.zeros(1000, 1, 4, 4))
    assert drawn.shape == (1000, 1, 1, 1) and 0.25 <= drawn.min() < 0.3 and 1.45 < drawn.max() <= 1.5
    with pytest.raises(DataError, match="--noise_scale"):
        train.parse_args(["--noise_scale", "1.5", "0.5"])


# ------------------------------------------------------------------ the two updates

def test_discriminator_step_sends_no_gradient_into_generator(make_trainer):
    trainer = make_trainer()
    a, b, c = triplet()
    fakes, _ = trainer.fuse(a, b, c)
    trainer.model.zero_grad(set_to_none=True)
    trainer.discriminator_step(c, torch.cat(fakes))
    assert all(p.grad is None for p in trainer.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.D.parameters())


def test_generator_step_computes_no_gradient_for_the_discriminator(make_trainer):
    trainer = make_trainer()
    a, b, c = triplet()
    fakes, _ = trainer.generator_step(a, b, c)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters())  # G's own update ran
    assert all(p.grad is None for p in trainer.D.parameters())  # D was frozen: no backward into its weights
    # ...and is trainable again afterwards: the D step that follows computes its gradient and moves it.
    assert all(p.requires_grad for p in trainer.D.parameters())
    before = [p.detach().clone() for p in trainer.D.parameters()]
    trainer.discriminator_step(c, fakes)
    assert all(p.grad is not None for p in trainer.D.parameters())
    assert any(not torch.equal(x, p) for x, p in zip(before, trainer.D.parameters()))


def test_wgan_clipping_bounds_every_discriminator_weight(make_trainer):
    trainer = make_trainer(gan="wgan", clip=0.005, lr_d=0.5)  # a huge lr would push weights far out
    trainer.step(*triplet())
    weights = torch.cat([p.detach().flatten() for p in trainer.D.parameters()])
    assert weights.abs().max() <= 0.005 + 1e-12
    assert weights.abs().max() > 0.004  # clipping bit: the big step went past the bound


# ------------------------------------------------------------------ the losses and the recipe's options

@pytest.mark.parametrize("options, fake_weight, lam", [
    ({}, 0.1, 6.0),                                   # the published LSGAN recipe
    ({"gan": "wgan"}, 1 / 6, 6.0),                    # WGAN: the six fakes weigh as much as the real image
    ({"d_fake_weight": 0.5, "lam": 2.0}, 0.5, 2.0),   # --d_fake_weight and --lam are what the losses use
], ids=["lsgan", "wgan", "d_fake_weight-lam"])
def test_discriminator_and_generator_losses(make_trainer, options, fake_weight, lam):
    """D: GAN(D(C_C), real) + d_fake_weight x 6 x GAN(D(six fakes), fake); G: 6 x GAN(D(six fakes), real) +
    lam x identity; GAN = MSE against 1 / 0 for lsgan, -mean / +mean for wgan."""
    critic = KnownCritic()
    trainer = make_trainer(generator=BlurResidual(), discriminator=critic, zero_mean=False, **options)
    assert trainer.d_fake_weight == pytest.approx(fake_weight) and trainer.args.lam == lam
    a, b, _ = triplet()
    c = 0.8 + 0.2 * torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))  # real: brighter, other scores
    with torch.no_grad():
        fake_list, (noise_a, noise_b) = trainer.fuse(a, b, c)
        fakes = torch.cat(fake_list)
        real_scores, fake_scores = critic(c), critic(fakes)
    if trainer.args.gan == "lsgan":
        ones, zeros = torch.ones_like(fake_scores), torch.zeros_like(fake_scores)
        want_d = F.mse_loss(real_scores, ones[:len(c)]) + fake_weight * 6 * F.mse_loss(fake_scores, zeros)
        want_adversarial = 6 * F.mse_loss(fake_scores, ones)
    else:
        want_d = -real_scores.mean() + fake_weight * 6 * fake_scores.mean()
        want_adversarial = -6 * fake_scores.mean()
    c_a1, c_b1, c_a2, c_b2, c_c1, c_c2 = fake_list
    want_identity = ((c_a1 - c_a2).abs().mean() + (c_b1 - c_b2).abs().mean()
                     + (c_c1 - c).abs().mean() + (c_c2 - c).abs().mean())
    loss, adversarial, identity = trainer.generator_loss(fakes, c, noise_a, noise_b)
    assert adversarial.item() == pytest.approx(want_adversarial.item(), rel=1e-6)
    assert identity.item() == pytest.approx(want_identity.item(), rel=1e-6)
    assert loss.item() == pytest.approx(want_adversarial.item() + lam * want_identity.item(), rel=1e-6)
    assert trainer.discriminator_step(c, fakes) == pytest.approx(want_d.item(), rel=1e-6, abs=1e-7)


def generator_losses(make_trainer, option, values):
    """({value: G's loss on one triplet with --option value}, the six fakes, (N_A, N_B), C_C) for a fixed G and critic."""
    a, b, c = triplet()
    losses = {}
    for value in values:
        trainer = make_trainer(generator=BlurResidual(), discriminator=KnownCritic(), zero_mean=False, **{option: value})
        with torch.no_grad():
            fakes, (noise_a, noise_b) = trainer.fuse(a, b, c)
            losses[value] = trainer.generator_loss(torch.cat(fakes), c, noise_a, noise_b)[0].item()
    return losses, fakes, (noise_a, noise_b), c


def test_sigma_rep_adds_the_repulsion_term_to_the_generator_loss(make_trainer):
    losses, _, (noise_a, noise_b), _ = generator_losses(make_trainer, "sigma_rep", (0.0, 0.5))
    repulsion = 0.5 * (torch.exp(-(noise_a - noise_b).abs().mean()) - 1).item()
    assert repulsion < -1e-3  # N_A != N_B: a real, negative term
    assert losses[0.5] - losses[0.0] == pytest.approx(repulsion, rel=1e-4)


def test_ssim_loss_is_one_minus_the_ssim_column():
    rng = np.random.default_rng(0)
    for shape in [(24, 30), (40, 17)]:
        ref = rng.random(shape)
        img = np.clip(ref + 0.15 * rng.standard_normal(shape), 0, 1)
        got = 1 - trainers.ssim_loss(torch.tensor(img)[None, None], torch.tensor(ref)[None, None]).item()
        assert got == pytest.approx(utils.ssim(ref, img), abs=1e-5)


def test_ssim_weight_adds_one_minus_ssim_of_the_four_identity_pairs(make_trainer):
    losses, fakes, _, c = generator_losses(make_trainer, "ssim_weight", (0.0, 2.0))
    c_a1, c_b1, c_a2, c_b2, c_c1, c_c2 = fakes
    pairs = [(c_a2, c_a1), (c_b2, c_b1), (c_c1, c), (c_c2, c)]
    want = np.mean([[utils.ssim(y[i, 0].numpy(), x[i, 0].numpy()) for i in range(len(x))] for x, y in pairs])
    assert 0.05 < 1 - want < 0.95  # the pairs differ: a real term
    assert losses[2.0] - losses[0.0] == pytest.approx(2.0 * (1 - want), rel=1e-4)


def test_replay_buffer_keeps_the_first_fakes_then_swaps_about_half():
    torch.manual_seed(0)
    pool = trainers.ReplayBuffer(4)
    first = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    assert torch.equal(pool(first), first)  # filling: the fakes pass through...
    assert len(pool.images) == 4 and all(torch.equal(x, y) for x, y in zip(pool.images, first))  # ...and are stored
    later = (100 + torch.arange(400.0)).view(400, 1, 1, 1).expand(400, 1, 2, 2)
    out = pool(later)
    swapped = [i for i in range(400) if not torch.equal(out[i], later[i])]
    assert 160 <= len(swapped) <= 240  # each fake swapped with probability 1/2: 200 +- 10
    for i in swapped:  # a swapped-in image is a stored one: one of the first four, or an earlier fake of this batch
        value = out[i, 0, 0, 0].item()
        assert value in (0, 1, 2, 3) or 100 <= value < 100 + i
    assert len(pool.images) == 4
    assert trainers.ReplayBuffer(0)(later) is later  # --pool_size 0: off


def test_pool_size_shows_d_stored_fakes(make_trainer):
    critic = KnownCritic()
    trainer = make_trainer(generator=BlurResidual(), discriminator=critic, pool_size=12)
    assert trainer.replay.size == 12
    c = triplet()[2]
    first, second = (torch.cat(trainer.fuse(*triplet(seed=seed))[0]).detach() for seed in (1, 2))
    trainer.discriminator_step(c, first)  # fills the pool: all 12 fakes of the first step
    torch.testing.assert_close(critic.seen[-1][2:], first)
    trainer.discriminator_step(c, second)
    shown = critic.seen[-1][2:]
    from_first = [i for i in range(12) if any(torch.equal(shown[i], old) for old in first)]
    # each fake shown is its own, one stored at the first step, or one of this step's stored when an earlier one was swapped
    assert all(i in from_first or any(torch.equal(shown[i], new) for new in second[:i + 1]) for i in range(12))
    assert 0 < len(from_first) < 12, from_first  # some of D's fakes are the stored ones


# ------------------------------------------------------------------ the collapse guard and the EMA

@pytest.mark.parametrize("generator, fires", [(ConstantNoise, True), (BlurResidual, False)])
def test_collapse_guard(make_trainer, generator, fires):
    trainer = make_trainer(generator=generator())
    stats = trainer.step(*triplet())
    assert (trainers.collapse_warning(stats) is not None) == fires


def test_collapse_guard_silent_for_the_shipped_checkpoint_on_speckle():
    """The shipped generator on synthetic speckle crops is no collapse; a constant-noise G is."""
    denoiser = models.load_checkpoint(SHIPPED)[0]
    crops = np.stack([synthetic.noisy_clean_pair(seed, 128, 128)[0][32:96, 32:96] for seed in range(4)])
    inputs = torch.from_numpy(crops)[:, None]
    with torch.no_grad():  # a --neighbours net reads a lone B-scan as copies of itself
        noise = denoiser.net(inputs.repeat(1, 1 + denoiser.neighbours, 1, 1))
        constant = ConstantNoise()(inputs)
    stats = trainers.collapse_stats(noise, inputs)
    assert stats["noise_distance"] / stats["input_distance"] > 0.1  # measured 0.74: far above the 0.01 tolerance
    assert trainers.collapse_warning(stats) is None
    assert trainers.collapse_warning(trainers.collapse_stats(constant, inputs)) is not None


def test_collapse_tol_is_the_tolerance_the_training_log_checks(tmp_path, capsys, trainer_args):
    """train.py --collapse_tol reaches the guard: a tolerance above the ratio fires, one below does not."""
    base = {"loss_g": 1.0, "loss_d": 1.0, "adversarial": 0.5, "identity": 0.1, "noise_mean": 0.0}
    by_distance = {**base, "noise_distance": 0.05, "input_distance": 1.0, "noise_spread": 1.0}  # |N_A - N_B| 5 %
    by_spread = {**base, "noise_distance": 1.0, "input_distance": 1.0, "noise_spread": 0.05}  # spread 5 %
    for k, stats in enumerate((by_distance, by_spread)):
        assert trainers.collapse_warning(stats, 0.1) is not None and trainers.collapse_warning(stats, 0.01) is None
        for tolerance, fires in ((0.1, True), (0.01, False)):
            ckpt_dir = tmp_path / f"{k}-{tolerance}"
            ckpt_dir.mkdir()
            run = train.Run(trainer_args(collapse_tol=tolerance, log_every=1, ckpt_dir=str(ckpt_dir)), None, [],
                            ddp=False, rank=0, world=1, steps_per_epoch=10)
            run.step = 1
            run.log(stats, epoch_done=False, last=False)
            assert ("generator collapse" in capsys.readouterr().out) == fires, (tolerance, stats)


@pytest.mark.parametrize("decay", [0.99, 0.1], ids=["warm-up", "decay"])
def test_ema_after_one_step_is_the_warm_up_weighted_average(make_trainer, decay):
    """ema = d x initial + (1 - d) x live with d = min(decay, (1 + n) / (10 + n)), n = 1 update."""
    trainer = make_trainer(ema=decay, lr_g=1e-2)  # a big step, so a wrong weight shows
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    assert all(torch.equal(e, p) for e, p in zip(trainer.ema.parameters(), initial))
    trainer.step(*triplet())
    d = min(decay, (1 + 1) / (10 + 1))
    assert trainer.ema_updates == 1
    live = list(trainer.model.parameters())
    assert max((p - q).abs().max().item() for p, q in zip(live, initial)) > 1e-3  # G moved
    for ema, start, now in zip(trainer.ema.parameters(), initial, live):
        torch.testing.assert_close(ema, d * start + (1 - d) * now.detach(), rtol=1e-6, atol=1e-7)
        assert ema.grad_fn is None and not ema.requires_grad  # outside autograd: no graph kept from step to step
    for ema, now in zip(trainer.ema.buffers(), trainer.model.buffers()):  # BN statistics: copied
        assert torch.equal(ema, now)
    assert trainer.denoiser().net is trainer.ema  # what validation and the checkpoint's inference use


# ------------------------------------------------------------------ train.py

TINY = ["--patch_size", "32", "--batch_size", "2", "--epoch_size", "8", "--log_every", "1", "--n_val", "1"]


def run_train(tmp_path, *extra):
    train.main([*TINY, "--ckpt_dir", str(tmp_path / "ckpt"), "--img_dir", str(tmp_path / "img"), *extra])


def log_rows(tmp_path):
    with open(tmp_path / "ckpt" / "log.csv") as f:
        return list(csv.DictReader(f))


def test_train_writes_checkpoint_figure_log_and_evaluates(tmp_path):
    run_train(tmp_path, "--niter", "1", "--lr_g", "1e-2")  # a big lr: 4 steps take G's EMA far from the live G
    path = tmp_path / "ckpt" / "epoch_1.pth"
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 4 and state["backbone"] == "dncnn" and state["method"] == "tcfl"
    assert {"generator", "generator_ema", "discriminator", "opt_g", "opt_d", "rng", "args", "history"} <= set(state)
    assert isinstance(state["args"], dict) and state["args"]["batch_size"] == 2
    assert not any(k.startswith("module.") for k in state["generator"])
    assert (tmp_path / "img" / "epoch_1.png").is_file() and (tmp_path / "ckpt" / "opt.txt").is_file()
    rows, recorded = log_rows(tmp_path), state["history"][-1]
    assert len(rows) == 4 and recorded["epoch"] == 1 and recorded["step"] == 4
    # The validation score train.py recorded is what evaluate.py gives the checkpoint on the same held-back
    # image (--split val reads the run's --n_val 1 from the checkpoint): both denoise with the EMA weights.
    summary = evaluate.main(["--epoch", "1", "--ckpt_dir", str(tmp_path / "ckpt"), "--split", "val",
                             "--out_dir", str(tmp_path / "ev"), "--json", str(tmp_path / "ev.json")])
    assert [row["id"] for row in summary["per_image"]] == ["val_0"]
    assert recorded["val_psnr"] == pytest.approx(summary["mean"]["PSNR"], abs=1e-4)
    assert recorded["val_ssim"] == pytest.approx(summary["mean"]["SSIM"], abs=1e-6)
    live = models.build_generator("dncnn")
    live.load_state_dict(state["generator"])
    sample = scoring.load_scoring_pairs(Namespace(dataset="synthetic", data_root=None, split="val"), state["args"])[0]
    live_psnr = utils.psnr(sample.clean, models.Denoiser(live.eval(), zero_mean=True)(sample.noisy))
    assert abs(live_psnr - recorded["val_psnr"]) > 0.01  # measured ~6 dB: the comparison can tell EMA from live weights
    assert float(rows[-1]["val_psnr"]) == pytest.approx(recorded["val_psnr"], abs=1e-3)  # the log's 6 digits
    assert (tmp_path / "ev.json").is_file() and (tmp_path / "ev" / "comparison.png").is_file()


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    run_train(straight, "--max_steps", "6", "--niter", "2")
    run_train(resumed, "--max_steps", "3", "--niter", "2")
    run_train(resumed, "--max_steps", "6", "--niter", "2", "--resume")
    rows_a, rows_b = log_rows(straight), log_rows(resumed)
    assert [r["step"] for r in rows_b] == [str(s) for s in range(1, 7)]
    for a, b in zip(rows_a, rows_b):
        assert (a["loss_g"], a["loss_d"], a["identity"]) == (b["loss_g"], b["loss_d"], b["identity"])
    ga = torch.load(straight / "ckpt" / "epoch_2.pth", weights_only=True)["generator"]
    gb = torch.load(resumed / "ckpt" / "epoch_2.pth", weights_only=True)["generator"]
    assert all(torch.equal(ga[k], gb[k]) for k in ga)


@pytest.mark.slow
def test_resume_keeps_the_columns_of_a_log_begun_without_val_ssim(tmp_path):
    run_train(tmp_path, "--max_steps", "3", "--niter", "2")
    with open(tmp_path / "ckpt" / "log.csv") as f:
        old = [{k: v for k, v in row.items() if k != "val_ssim"} for row in csv.DictReader(f)]
    with open(tmp_path / "ckpt" / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(old[0]))
        writer.writeheader()
        writer.writerows(old)
    run_train(tmp_path, "--max_steps", "6", "--niter", "2", "--resume")
    rows = log_rows(tmp_path)
    assert [r["step"] for r in rows] == [str(s) for s in range(1, 7)] and "val_ssim" not in rows[0]
    assert all(float(r["seconds"]) >= 0 for r in rows) and float(rows[-1]["val_psnr"]) > 0


def test_lateral_bin_trains_on_binned_scans_and_denoises_at_full_size(tmp_path, monkeypatch):
    seen = []
    real_dataset = train.datasets.TripletDataset
    monkeypatch.setattr(train.datasets, "TripletDataset",
                        lambda noisy, clean, *a, **k: seen.append((noisy, clean)) or real_dataset(noisy, clean, *a, **k))
    run_train(tmp_path, "--niter", "1", "--lateral_bin", "2")
    (noisy, clean), = seen
    assert {x.shape for x in noisy + clean} == {(256, 128)}  # the synthetic set is 256 x 256
    path = tmp_path / "ckpt" / "epoch_1.pth"
    denoiser, state = models.load_checkpoint(path)
    assert state["args"]["lateral_bin"] == 2 and denoiser.lateral_bin == 2
    # the noise levels --noise_adapt compares with: the training scans' median and lowest, binned as G sees them
    full_size = train.datasets.load_unpaired("synthetic")[0]
    levels = [utils.noise_sigma(utils.bin_laterally(x, 2)) for x in full_size[::max(1, len(full_size) // 100)]]
    assert denoiser.noise_bin == 2 and state["inference"]["noise_bin"] == 2
    assert denoiser.noise_sigma == pytest.approx(float(np.median(levels)), rel=1e-6)
    assert denoiser.quiet_sigma == pytest.approx(min(levels), rel=1e-6) and denoiser.quiet_sigma < denoiser.noise_sigma
    image = np.random.default_rng(0).random((64, 96), dtype=np.float32)
    denoiser.noise_sigma = None  # binning only here (noise adaptation: tests/test_models.py)
    full = denoiser(image)
    unbinned = models.Denoiser(denoiser.net, lateral_bin=1, zero_mean=denoiser.zero_mean)
    by_hand = np.clip(utils.at_lateral_scale(unbinned, image, 2), 0, 1)
    assert full.shape == image.shape
    np.testing.assert_allclose(full, by_hand, atol=1e-6)
    assert not np.allclose(full, unbinned(image), atol=1e-3)
    summary = evaluate.main(["--ckpt", str(path), "--out_dir", str(tmp_path / "ev")])
    assert np.isfinite(summary["mean"]["PSNR"])


def test_lateral_bin_below_one_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="--lateral_bin"):
        train.parse_args(["--lateral_bin", "0"])
    with pytest.raises(DataError, match="--lateral_bin 16 leaves training images 16 px wide, narrower than --patch_size 32"):
        run_train(tmp_path / "narrow", "--lateral_bin", "16")
    run_train(tmp_path, "--max_steps", "1")
    with pytest.raises(DataError, match="--lateral_bin"):
        evaluate.main(["--ckpt", str(tmp_path / "ckpt" / "epoch_1.pth"), "--lateral_bin", "0"])


def test_existing_checkpoints_are_not_overwritten(tmp_path):
    run_train(tmp_path, "--max_steps", "1")
    with pytest.raises(DataError, match="--resume .* or --overwrite"):
        run_train(tmp_path, "--max_steps", "1")
    run_train(tmp_path, "--max_steps", "1", "--overwrite")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_step, calls = trainers.TCFLTrainer.step, []

    def step(self, *batch):
        stats = real_step(self, *batch)
        calls.append(1)
        if len(calls) == 6:
            stats["loss_g"] = float("nan")
        return stats

    monkeypatch.setattr(trainers.TCFLTrainer, "step", step)
    with pytest.raises(train.TrainingStopped, match="non-finite loss at step 6"):
        run_train(tmp_path, "--niter", "3")
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("epoch_*.pth")) == ["epoch_1.pth"]


def test_ctrl_c_saves_a_checkpoint_then_exits(tmp_path, monkeypatch):
    real_step, calls = trainers.TCFLTrainer.step, []

    def step(self, *batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self, *batch)

    monkeypatch.setattr(trainers.TCFLTrainer, "step", step)
    with pytest.raises(train.TrainingStopped, match="interrupted at step 2"):
        run_train(tmp_path, "--niter", "2")
    assert torch.load(tmp_path / "ckpt" / "epoch_1.pth", weights_only=True)["step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_real_signal_stops_a_running_train_py_with_a_checkpoint(tmp_path, signum):
    """A real process and a real signal. SIGINT starts ignored, as in a shell's background job."""
    ckpt = tmp_path / "ckpt"
    command = [sys.executable, str(Path(train.__file__)), *TINY, "--niter", "1000",
               "--ckpt_dir", str(ckpt), "--img_dir", str(tmp_path / "img")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (ckpt / "log.csv").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[1][-2000:]
    process.send_signal(signum)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"train.py kept running for 60 s after signal {signum.name}")
    assert process.returncode == 1, stderr[-2000:]
    assert "interrupted at step" in stderr and "continue with --resume" in stderr
    state = torch.load(sorted(ckpt.glob("epoch_*.pth"))[-1], weights_only=True)
    assert state["step"] >= 1


# ------------------------------------------------------------------ checkpoints given to evaluate.py

def test_missing_checkpoint_lists_available_epochs(tmp_path):
    (tmp_path / "epoch_3.pth").write_bytes(b"")
    (tmp_path / "epoch_7.pth").write_bytes(b"")
    with pytest.raises(DataError, match="available epochs: 3, 7"):
        evaluate.main(["--epoch", "5", "--ckpt_dir", str(tmp_path)])


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    path = tmp_path / "epoch_1.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(DataError, match="not a readable checkpoint"):
        models.load_checkpoint(path)


def test_wrong_architecture_checkpoint_is_one_clear_error(tmp_path):
    path = tmp_path / "g.pth"
    torch.save({"generator": models.build_generator("unet").state_dict(), "backbone": "dncnn"}, path)
    with pytest.raises(DataError, match=r"do not fit a tcfl \(dncnn\) generator"):
        models.load_checkpoint(path)


def test_identity_losses_are_blind_to_a_constant_offset_which_zero_mean_removes(trainer_args):
    """Why --zero_mean exists: G + c gives the same identity loss, so only D would pin c."""
    torch.manual_seed(0)
    base = BlurResidual()

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x) + 0.2

    a, b, c = triplet()
    results = {}
    for zero_mean in (False, True):
        for name, generator in (("base", base), ("shifted", Shifted())):
            trainer = trainers.TCFLTrainer(trainer_args(zero_mean=zero_mean), generator=generator)
            with torch.no_grad():
                fakes, _ = trainer.fuse(a, b, c)
            results[zero_mean, name] = (trainer.identity_loss(fakes, c).item(), torch.cat(fakes).mean().item())
    assert results[False, "base"][0] == pytest.approx(results[False, "shifted"][0], abs=1e-5)
    assert results[False, "shifted"][1] < results[False, "base"][1] - 0.1  # the offset darkens every estimate
    assert results[True, "shifted"][1] == pytest.approx(results[True, "base"][1], abs=1e-5)
    x = torch.rand(1, 1, 40, 50)
    assert models.predict_noise(Shifted(), x, tile=16, zero_mean=True).mean().abs() < 1e-6  # whole-image mean, after tiling


def test_epoch_best_picks_the_highest_validation_psnr(tmp_path):
    (tmp_path / "log.csv").write_text("epoch,step,val_psnr\n1,5,\n1,10,20.5\n2,20,22.25\n3,30,21.0\n")
    assert models.best_epoch(tmp_path) == 2
    (tmp_path / "log.csv").write_text("epoch,step,val_psnr\n1,5,\n")
    with pytest.raises(DataError, match="no validation PSNR"):
        models.best_epoch(tmp_path)
    with pytest.raises(DataError, match="epoch_2.pth: checkpoint not found"):
        (tmp_path / "log.csv").write_text("epoch,step,val_psnr\n2,20,22.25\n")
        evaluate.main(["--epoch", "best", "--ckpt_dir", str(tmp_path)])


def test_evaluate_split_val_scores_the_images_train_py_validates_on():
    from datasets import load_unpaired
    samples = scoring.load_scoring_pairs(Namespace(dataset="synthetic", data_root=None, split="val"))
    validation = load_unpaired("synthetic", None, "train", n_val=2)[2]
    assert [s.id for s in samples] == [s.id for s in validation] == ["val_0", "val_1"]
    for got, want in zip(samples, validation):
        np.testing.assert_array_equal(got.noisy, want.noisy)
        np.testing.assert_array_equal(got.clean, want.clean)
