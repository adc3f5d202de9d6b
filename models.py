"""Generators (noise predictors) and the PatchGAN discriminator.

Every generator maps a noisy B-scan x (N, 1, H, W) to its estimated noise n, so the
denoised image is x - G(x), as in TCFL. With in_channels = 1 + k (train.py --neighbours k) it
reads the B-scan and its k nearest registered B-scans and still returns the B-scan's noise.
Pick one with --backbone; GENERATORS maps the name to the class.
"""
import argparse
from concurrent.futures import ThreadPoolExecutor
import contextlib
import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

import baselines
from utils import (DataError, at_lateral_scale, bin_laterally, check_lateral_bin, context_stack, noise_sigma,
                   resolve_device, use_bf16)


def init_weights(module):
    """The published recipe's init: conv weights ~ N(0, 0.02), norm scales ~ N(1, 0.02)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DnCNN(nn.Module):
    """The published TCFL generator: 10 3x3 convs, 64 features, BN + LeakyReLU inside."""

    def __init__(self, depth=10, features=64, in_channels=1):
        super().__init__()
        layers = [nn.Conv2d(in_channels, features, 3, padding=1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(features, features, 3, padding=1, bias=False),
                       nn.BatchNorm2d(features), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(features, 1, 3, padding=1, bias=False))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


def conv_block(in_channels, out_channels):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.LeakyReLU(0.2, inplace=True))


class UNet(nn.Module):
    """A small 3-level UNet; pads any input to a multiple of 8 and crops back."""

    def __init__(self, features=32, in_channels=1):
        super().__init__()
        f = features
        self.down = nn.ModuleList([conv_block(in_channels, f), conv_block(f, 2 * f), conv_block(2 * f, 4 * f)])
        self.bottom = conv_block(4 * f, 8 * f)
        self.up = nn.ModuleList([nn.ConvTranspose2d(8 * f, 4 * f, 2, stride=2),
                                 nn.ConvTranspose2d(4 * f, 2 * f, 2, stride=2),
                                 nn.ConvTranspose2d(2 * f, f, 2, stride=2)])
        self.merge = nn.ModuleList([conv_block(8 * f, 4 * f), conv_block(4 * f, 2 * f), conv_block(2 * f, f)])
        self.out = nn.Conv2d(f, 1, 1)
        self.stride = 8

    def forward(self, x):
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.stride, -width % self.stride
        # Reflection keeps the speckle statistics at the border; zeros would look like signal-free background.
        y = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else x
        skips = []
        for block in self.down:
            y = block(y)
            skips.append(y)
            y = F.max_pool2d(y, 2)
        y = self.bottom(y)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            y = merge(torch.cat([up(y), skip], dim=1))
        return self.out(y)[..., :height, :width]


class DenseBlock(nn.Module):
    """SRDenseNet block: each layer sees all earlier feature maps, adds `growth` channels."""

    def __init__(self, in_channels, growth=16, layers=8):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels + i * growth, growth, 3, padding=1), nn.ReLU(inplace=True))
            for i in range(layers))
        self.out_channels = in_channels + layers * growth

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class SRDenseNet(nn.Module):
    """SRDenseNet with all blocks' outputs concatenated and a 1x1 bottleneck;
    the upsampling of the super-resolution original is dropped (stride 1 throughout)."""

    def __init__(self, blocks=4, growth=16, layers_per_block=4, features=64, in_channels=1):
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(in_channels, features, 3, padding=1), nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList()
        channels = features
        for _ in range(blocks):
            block = DenseBlock(channels, growth, layers_per_block)
            self.blocks.append(block)
            channels = block.out_channels
        self.bottleneck = nn.Sequential(nn.Conv2d(channels, features, 1), nn.ReLU(inplace=True))
        self.tail = nn.Conv2d(features, 1, 3, padding=1)

    def forward(self, x):
        y = self.head(x)
        for block in self.blocks:
            y = block(y)
        return self.tail(self.bottleneck(y))


class PatchGAN(nn.Module):
    """The published discriminator: C64-C128-C256-C512 (4x4, stride 2), output H/16 x W/16."""

    def __init__(self, features=64):
        super().__init__()
        layers, channels = [], 1
        for i, out in enumerate([features, 2 * features, 4 * features, 8 * features]):
            layers.append(nn.Conv2d(channels, out, 4, stride=2, padding=1))
            if i > 0:
                layers.append(nn.InstanceNorm2d(out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            channels = out
        layers += [nn.ZeroPad2d((1, 0, 1, 0)), nn.Conv2d(channels, 1, 4, padding=1, bias=False)]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


GENERATORS = {"dncnn": DnCNN, "unet": UNet, "srdensenet": SRDenseNet}


def gaussian_taps(sigma):
    """A normalised 1-D Gaussian, truncated at 3 sigma (a single 1 for sigma 0)."""
    radius = int(3 * sigma + 0.5)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / max(sigma, 1e-6)) ** 2)
    return taps / taps.sum()


def separable_taps(sigma_axial, sigma_lateral):
    """The (axial, lateral) Gaussian taps separable_blur takes, shaped (1, 1, -1, 1) and (1, 1, 1, -1)."""
    return gaussian_taps(sigma_axial).view(1, 1, -1, 1), gaussian_taps(sigma_lateral).view(1, 1, 1, -1)


def separable_blur(image, taps_axial, taps_lateral):
    """A (N, 1, H, W) batch through separable_taps' 1-D Gaussians, borders
    replicated: any image size and a zero sigma work (torchvision's gaussian_blur reflect-pads, which fails
    on tiles narrower than the kernel, and refuses sigma 0)."""
    axial, lateral = taps_axial.shape[2] // 2, taps_lateral.shape[3] // 2
    image = F.conv2d(F.pad(image, (0, 0, axial, axial), mode="replicate"), taps_axial)
    return F.conv2d(F.pad(image, (lateral, lateral, 0, 0), mode="replicate"), taps_lateral)


class FilterSkip(nn.Module):
    """A generator that starts as a classical filter (train.py --skip_blur / --skip_nlm): its noise estimate
    is x - filter(x), the filter's residual, plus the backbone's correction, whose last convolution starts
    at zero. Trained from scratch for a few hundred CPU steps, TCFL's DnCNN stayed below a tuned Gaussian
    blur on the Duke scans (docs/training.md); from here it only has to learn what the filter misses.
    The filter reads filter_input(x): the B-scan (channel 0), or with centre_weight < 1 (--skip_centre_weight)
    its blend with its neighbours' mean; subclasses define the filter."""

    def __init__(self, net, centre_weight=1.0):
        super().__init__()
        self.net = net
        self.centre_weight = float(centre_weight)
        self.zero_correction()

    def zero_correction(self):
        """Zero the backbone's last convolution: the generator then denoises as its filter alone."""
        last = [m for m in self.net.modules() if isinstance(m, nn.Conv2d)][-1]
        nn.init.zeros_(last.weight)
        if last.bias is not None:
            nn.init.zeros_(last.bias)

    def filter(self, image):
        raise NotImplementedError

    def register_taps(self, sigma_axial, sigma_lateral):
        """The separable Gaussian's taps as buffers (they follow .to(device)), rebuilt from the sigmas, not saved."""
        taps_axial, taps_lateral = separable_taps(sigma_axial, sigma_lateral)
        self.register_buffer("taps_axial", taps_axial, persistent=False)
        self.register_buffer("taps_lateral", taps_lateral, persistent=False)

    def blend_noise(self, neighbours):
        """The noise std of filter_input's blend relative to one B-scan's, for `neighbours` B-scans of independent
        noise beside it: sqrt(w^2 + (1 - w)^2 / k); 1 for the B-scan alone."""
        if self.centre_weight == 1 or not neighbours:
            return 1.0
        return float(np.sqrt(self.centre_weight ** 2 + (1 - self.centre_weight) ** 2 / neighbours))

    def filter_input(self, x):
        """centre_weight < 1 (--skip_centre_weight, a --neighbours generator): centre_weight x the B-scan +
        (1 - centre_weight) x its neighbours' mean; a lone B-scan (neighbours = copies of it) reads itself."""
        if self.centre_weight == 1 or x.shape[1] == 1:
            return x[:, :1]
        return self.centre_weight * x[:, :1] + (1 - self.centre_weight) * x[:, 1:].mean(1, keepdim=True)

    def forward(self, x):
        return x[:, :1] - self.filter(self.filter_input(x)) + self.net(x)


class BlurSkip(FilterSkip):
    """FilterSkip over an anisotropic Gaussian blur (--skip_blur): sigma_axial / sigma_lateral in pixels
    of the (binned) B-scans the generator reads. centre_weight < 1 (--skip_centre_weight, a --neighbours
    generator): the blur reads centre_weight x the B-scan + (1 - centre_weight) x its neighbours' mean, so G
    starts as the blur of a weighted average of registered B-scans; a lone B-scan (neighbours = copies of
    it) gets the plain blur."""

    def __init__(self, net, sigma_axial, sigma_lateral, centre_weight=1.0):
        super().__init__(net, centre_weight)
        self.sigmas = (float(sigma_axial), float(sigma_lateral))
        self.register_taps(sigma_axial, sigma_lateral)

    def filter(self, image):
        return separable_blur(image, self.taps_axial, self.taps_lateral)

    @contextlib.contextmanager
    def blurring(self, sigma_axial, sigma_lateral):
        """Inside the block the start is a Gaussian of these sigmas (Denoiser's lone_blur); the correction is unchanged."""
        saved = self.taps_axial, self.taps_lateral
        self.taps_axial, self.taps_lateral = (taps.to(saved[0]) for taps in separable_taps(sigma_axial, sigma_lateral))
        try:
            yield
        finally:
            self.taps_axial, self.taps_lateral = saved


class NumpyFilterSkip(FilterSkip):
    """FilterSkip over a classical filter that runs in NumPy on the CPU (`numpy_filter`: one 2-D float32 image
    in, one out) and has no gradient: the backward pass takes a Gaussian's (sigmas `surrogate`, the shipped
    blur start's) in its place, so a pseudo-noisy input's gradient still reaches the earlier estimates
    through a smoothing of it. With centre_weight < 1 it reads the neighbour blend, as BlurSkip does.
    blur_share > 0 (--skip_blur_share) mixes that Gaussian into the start: blur_share x it + (1 - blur_share) x
    the filter (the Gaussian keeps PSNR where the filter keeps SSIM; docs/training.md)."""

    def __init__(self, net, centre_weight=1.0, surrogate=(1.0, 3.0), blur_share=0.0):
        super().__init__(net, centre_weight)
        self.register_taps(*surrogate)
        self.blur_share = float(blur_share)

    def numpy_filter(self, array):
        raise NotImplementedError

    def filtered(self, image):
        arrays = image.detach().float().cpu().numpy()
        # bm3d and OpenCV's NLM release the GIL (bm3d spends ~0.3 s per call whatever the size): one thread per core.
        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            out = np.stack(list(pool.map(lambda array: self.numpy_filter(array[0]), arrays))).astype(np.float32)
        return torch.from_numpy(out)[:, None].to(device=image.device, dtype=image.dtype)

    def filter(self, image):
        """blur_share x the Gaussian + (1 - blur_share) x the filter forward, the Gaussian's gradient backward."""
        if not self.blur_share and not (torch.is_grad_enabled() and image.requires_grad):
            return self.filtered(image)
        blurred = separable_blur(image, self.taps_axial, self.taps_lateral)
        return blurred + (1 - self.blur_share) * (self.filtered(image) - blurred).detach()


def nlm_filter(array, h):
    """NLM.py's non-local means (OpenCV's fastNlMeansDenoising, 8-bit path, NLM.py's windows) of strength h."""
    return baselines.nlm(array, h, baselines.TEMPLATE, baselines.SEARCH, eight_bit=True)


BM3D_PROFILES = {"hard": baselines.bm3d_hard_threshold, "lc": baselines.bm3d_low_complexity}


class NLMSkip(NumpyFilterSkip):
    """NumpyFilterSkip over non-local means (--skip_nlm H): nlm_filter with strength h."""

    def __init__(self, net, h, centre_weight=1.0, blur_share=0.0):
        super().__init__(net, centre_weight, blur_share=blur_share)
        self.h = float(h)

    def numpy_filter(self, array):
        return nlm_filter(array, self.h)


class BM3DSkip(NumpyFilterSkip):
    """NumpyFilterSkip over BM3D (--skip_bm3d F) with the threshold F x the wavelet noise estimate of each image
    of the batch (F = BM3D.py's sigma_factor). profile (--skip_bm3d_profile): 'hard', BM3D.py's
    hard-thresholding stage; 'lc', both stages in the bm3d package's low-complexity profile."""

    def __init__(self, net, sigma_factor, centre_weight=1.0, blur_share=0.0, profile="hard"):
        super().__init__(net, centre_weight, blur_share=blur_share)
        self.sigma_factor = float(sigma_factor)
        self.profile = profile

    def numpy_filter(self, array):
        return BM3D_PROFILES[self.profile](array, self.sigma_factor)


class NLMBM3DSkip(BM3DSkip):
    """--skip_nlm H with --skip_bm3d F: the start filter is the mean of the two, whose errors differ enough
    that their mean beats either on the train subjects (docs/training.md, "The shipped start")."""

    def __init__(self, net, h, sigma_factor, centre_weight=1.0, blur_share=0.0, profile="hard"):
        super().__init__(net, sigma_factor, centre_weight, blur_share, profile)
        self.h = float(h)

    def numpy_filter(self, array):
        return (nlm_filter(array, self.h) + super().numpy_filter(array)) / 2


def build_generator(backbone, in_channels=1, skip_blur=(0.0, 0.0), skip_nlm=0.0, skip_centre_weight=1.0, skip_bm3d=0.0,
                    skip_blur_share=0.0, skip_bm3d_profile="hard"):
    """skip_blur (axial, lateral sigma; any > 0): wrapped in BlurSkip; skip_nlm (h > 0): in NLMSkip;
    skip_bm3d (sigma factor > 0): in BM3DSkip (skip_bm3d_profile: its BM3DSkip profile); both skip_nlm and
    skip_bm3d: in NLMBM3DSkip. skip_centre_weight: the start's centre_weight (FilterSkip); skip_blur_share:
    the Gaussian's share of an NLM or BM3D start (NumpyFilterSkip)."""
    if backbone not in GENERATORS:
        raise ValueError(f"unknown --backbone {backbone} (choose from {', '.join(GENERATORS)})")
    if skip_bm3d_profile not in BM3D_PROFILES:
        raise ValueError(f"unknown --skip_bm3d_profile {skip_bm3d_profile} (choose from {', '.join(BM3D_PROFILES)})")
    model = GENERATORS[backbone](in_channels=in_channels)
    model.apply(init_weights)
    if any(skip_blur) and (skip_nlm or skip_bm3d):
        raise ValueError("a generator starts from the Gaussian (skip_blur) or from NLM and/or BM3D, not both")
    if any(skip_blur):
        model = BlurSkip(model, *skip_blur, centre_weight=skip_centre_weight)
    start = {"centre_weight": skip_centre_weight, "blur_share": skip_blur_share}
    if skip_nlm and skip_bm3d:
        model = NLMBM3DSkip(model, skip_nlm, skip_bm3d, profile=skip_bm3d_profile, **start)
    elif skip_nlm:
        model = NLMSkip(model, skip_nlm, **start)
    elif skip_bm3d:
        model = BM3DSkip(model, skip_bm3d, profile=skip_bm3d_profile, **start)
    if in_channels > 1:
        # The neighbours' input weights start at zero: G starts as the single-B-scan network and learns
        # to use the neighbours from there (random ones slowed the first 200 steps: docs/training.md).
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        with torch.no_grad():
            first.weight[:, 1:] = 0
    return model


def build_discriminator():
    model = PatchGAN()
    model.apply(init_weights)
    return model


@torch.no_grad()
def predict_noise(net, image, tile=512, margin=32, bf16=False, zero_mean=False):
    """net(image) for a (1, 1, H, W) tensor, in overlapping tiles when the image is large.

    Each tile is computed with `margin` extra pixels of context on every side and only
    its centre is kept: beyond the generator's receptive field (21 px for DnCNN) the
    result equals the untiled one, and memory stays bounded for any B-scan size.

    zero_mean (train.py --zero_mean): the spatial mean of the noise map is removed, over the
    whole image: display-domain speckle has zero mean, and TCFL's identity losses cannot see
    a constant offset in G's output.
    """
    height, width = image.shape[-2:]
    autocast = torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=bf16)
    if height <= tile + 2 * margin and width <= tile + 2 * margin:
        with autocast:
            noise = net(image).float()
    else:
        noise = torch.empty_like(image[:, :1])  # a stack's input channels -> its B-scan's noise
        for top in range(0, height, tile):
            for left in range(0, width, tile):
                t0, l0 = max(top - margin, 0), max(left - margin, 0)
                t1, l1 = min(top + tile + margin, height), min(left + tile + margin, width)
                with autocast:
                    out = net(image[..., t0:t1, l0:l1]).float()
                bottom, right = min(top + tile, height), min(left + tile, width)
                noise[..., top:bottom, left:right] = out[..., top - t0:bottom - t0, left - l0:right - l0]
    return noise - noise.mean(dim=(-2, -1), keepdim=True) if zero_mean else noise


# A scan quieter than the training scans starts from the blur start's sigmas x (its noise / theirs) ** this
# (Denoiser): 1/3, the exponent a smooth image's MSE-optimal Gaussian width follows in 2-D (sigma ~ noise ** (2 / 6)).
# On the synthetic validation phantoms (bench/robustness.py --dataset synthetic --split val; 0.26-0.71x the quietest
# training scan's noise estimate) it gains 0.2-2 dB and keeps SSIM level; larger exponents gain more PSNR and
# lose SSIM (docs/training.md).
QUIET_EXPONENT = 1 / 3

# Test-time ensembles, as (quarter turns, left-right flip) views. 'lr' keeps the B-scan upright, as
# training does (datasets.TripletDataset flips left-right only: up-down would put the vitreous below
# the retina); 'all' adds the rotations and up-down flips.
ENSEMBLES = {"lr": [(0, False), (0, True)],
             "all": [(k, flip) for flip in (False, True) for k in range(4)]}


class Denoiser:
    """A trained network with its inference settings: denoiser(image) -> image for a 2-D float
    B-scan in [0, 1]. What evaluate.py, denoise.py, the benchmarks and training's validation call,
    as they call the classical baselines' denoise functions.

    net: module noisy (N, 1, H, W) -> noise, so the output is clip(x - net(x), 0, 1).
    neighbours: k > 0 for a net trained with train.py --neighbours k, which reads (N, 1 + k, H, W): the
        B-scan, then its k nearest registered B-scans (utils.context_stack). Call it with the volume
        (S, H, W) and the index of the B-scan to denoise (default: the middle one, as Sample.volume()
        holds it); a 2-D B-scan alone gets copies of itself as neighbours (the fallback it trained on).
    lateral_bin: a net trained on B-scans binned N:1 laterally (train.py --lateral_bin) denoises
        the B-scan binned the same way, and the output is resized back to the input's size.
    zero_mean: remove the noise map's spatial mean (see predict_noise).
    ensemble: None, or average the flipped passes of ENSEMBLES['lr' | 'all'].
    lone_blur: (axial, lateral) sigmas, in pixels of the binned B-scan, of the start a BlurSkip generator with
        neighbours takes for a lone B-scan (no neighbours: copies of itself) in place of its own blend's
        Gaussian, which was chosen for the quieter blend of 5 B-scans (None: its own). Recorded in the checkpoint.
    tile, bf16: see predict_noise.
    noise_sigma: the training scans' noise level, estimated on them binned noise_bin:1 laterally (train.py records
        both; None: off). A B-scan, binned alike, noisier than that is fed to the net with its contrast
        compressed about its mean by gain = noise_sigma / its own noise estimate, and the net's noise estimate is
        expanded back by 1 / gain: the net sees speckle of the strength it learned, as BM3D.py's threshold follows
        its noise estimate. Quieter B-scans keep their contrast (see quiet_sigma): expanding it instead measured
        -0.42 to +0.16 dB on the synthetic validation phantoms (quieter than the training scans) and
        -0.05 to +0.05 on the Duke validation B-scans (docs/training.md). `last_gain`: the latest B-scan's.
    noise_bin: the lateral binning the noise levels are estimated at (train.py: its --lateral_bin, the scale the
        net denoises at; 1, full size, for checkpoints written before it recorded one). The wavelet estimate reads
        the finest scale, so at full size it misses speckle coarser than a pixel that the binned B-scan puts in
        the net's way (synthetic validation phantoms at s = 1.5: 27.65 dB estimated at full size, 30.30 at 4:1).
    quiet_sigma: the quietest training scan's noise level (train.py records it; None: noise_sigma). With
        noise_sigma set, a BlurSkip generator's start narrows for a scan quieter than that: the Gaussian's
        sigmas x (level / quiet_sigma) ** QUIET_EXPONENT, level = the median noise estimate of the B-scans it
        reads (the B-scan and its neighbours; a lone B-scan against the training blend's noise, start_scale);
        `last_start_scale`: the latest factor. The median, not the
        B-scan's own estimate: a B-scan quieter than its neighbours, as an average of registered B-scans is, is
        not a quieter scanner, and a narrower start lost 0.1-0.2 dB on such validation B-scans (docs/training.md).
    """

    def __init__(self, net, lateral_bin=1, zero_mean=False, ensemble=None, tile=512, bf16=False, noise_sigma=None,
                 neighbours=0, lone_blur=None, quiet_sigma=None, noise_bin=1):
        if ensemble is not None and ensemble not in ENSEMBLES:
            raise DataError(f"--ensemble must be one of {', '.join(ENSEMBLES)}, got {ensemble}")
        if lone_blur is not None:
            if not (isinstance(net, BlurSkip) and neighbours):
                raise DataError("--lone_blur sets the blur start of a generator trained with --neighbours and --skip_blur; "
                                "this checkpoint has none")
            if len(lone_blur) != 2 or min(lone_blur) < 0 or not any(lone_blur):
                raise DataError(f"--lone_blur needs two sigmas >= 0, not both 0, got {' '.join(map(str, lone_blur))}")
            lone_blur = tuple(float(sigma) for sigma in lone_blur)
        self.net, self.lateral_bin, self.zero_mean = net, check_lateral_bin(lateral_bin), zero_mean
        self.ensemble, self.tile, self.bf16, self.noise_sigma = ensemble, tile, bf16, noise_sigma
        self.neighbours, self.lone_blur, self.quiet_sigma = neighbours, lone_blur, quiet_sigma
        self.noise_bin = check_lateral_bin(noise_bin)
        self.last_gain = self.last_lone_gain = self.last_start_scale = 1.0

    def replace(self, **changes):
        """A Denoiser of the same net with these settings changed and every other one kept."""
        settings = {name: getattr(self, name) for name in
                    ("lateral_bin", "zero_mean", "ensemble", "tile", "bf16", "noise_sigma", "neighbours", "lone_blur",
                     "quiet_sigma", "noise_bin")}
        return Denoiser(self.net, **{**settings, **changes})

    def level(self, image):
        """The noise estimate of a full-size 2-D B-scan, at the scale the training levels were estimated (noise_bin)."""
        return noise_sigma(bin_laterally(image, self.noise_bin))

    def gain(self, level):
        """noise_sigma / `level`, the B-scan's noise estimate (level()), at most 1 (class docstring)."""
        if not self.noise_sigma:
            return 1.0
        return min(1.0, self.noise_sigma / max(level, 1e-6))

    def lone_gain(self, lone):
        """A lone B-scan read by an NLM or BM3D start (NumpyFilterSkip) with neighbours is its own blend, 1 /
        blend_noise times noisier than the blend that start filtered in training, whatever its level: its
        contrast is compressed by blend_noise as well, as such a filter, unlike a Gaussian, does not smooth
        more for noisier input (docs/training.md, "The NLM + Gaussian start"). 1 otherwise."""
        if lone and self.neighbours and isinstance(self.net, NumpyFilterSkip):
            return self.net.blend_noise(self.neighbours)
        return 1.0

    def start_scale(self, stack, centre_level, lone=False):
        """The factor on a BlurSkip start's sigmas for the B-scans `stack` (full size; centre_level: its first's
        noise estimate): below 1 for a quieter scan. The start's width was chosen for the blend it reads of a
        training stack, whose noise is the B-scans' x blend_noise(); a lone B-scan (copies as neighbours) is its
        own blend, so it compares with that."""
        if not (self.noise_sigma and isinstance(self.net, BlurSkip)):
            return 1.0
        levels = [centre_level] if lone else [centre_level] + [self.level(image) for image in stack[1:]]
        level = float(np.median(levels))
        reference = (self.quiet_sigma or self.noise_sigma) * (self.net.blend_noise(self.neighbours) if lone else 1.0)
        return min(1.0, level / reference) ** QUIET_EXPONENT

    def noise(self, x, gain=1.0):
        if gain >= 1.0:
            return predict_noise(self.net, x, self.tile, bf16=self.bf16, zero_mean=self.zero_mean)
        mean = x.mean()
        return predict_noise(self.net, mean + gain * (x - mean), self.tile, bf16=self.bf16, zero_mean=self.zero_mean) / gain

    @torch.no_grad()
    def denoise_tensor(self, x, gain=1.0):
        """(1, 1 + neighbours, H, W) -> the denoised B-scan (1, 1, H, W), clamped to [0, 1], averaged over the ensemble's views."""
        if not self.ensemble:
            return (x[:, :1] - self.noise(x, gain)).clamp(0, 1)
        views, total = ENSEMBLES[self.ensemble], torch.zeros_like(x[:, :1])
        for k, flip in views:
            view = torch.rot90(x.flip(-1) if flip else x, k, (-2, -1))
            out = torch.rot90(view[:, :1] - self.noise(view, gain), -k, (-2, -1))
            total += out.flip(-1) if flip else out
        return (total / len(views)).clamp(0, 1)

    def __call__(self, image, centre=None):
        """image: a 2-D B-scan, or a volume (S, H, W) and the index of its B-scan to denoise (default S // 2).
        Always in eval mode (BatchNorm on its running statistics), also for a network mid-training."""
        device = next((p.device for p in self.net.parameters()), torch.device("cpu"))

        image = np.asarray(image, np.float32)
        slices = image if image.ndim == 3 else image[None]
        centre = len(slices) // 2 if centre is None else centre
        stack = context_stack(slices, centre, self.neighbours)
        centre_level = self.level(stack[0]) if self.noise_sigma else None  # --noise_adapt's, both ways
        alone = len(slices) == 1
        self.last_gain, self.last_lone_gain = self.gain(centre_level), self.lone_gain(alone)
        gain = self.last_gain * self.last_lone_gain

        def at_scale(small):
            x = torch.from_numpy(np.ascontiguousarray(small, np.float32))[None].to(device)
            return self.denoise_tensor(x, gain)[0, 0].cpu().numpy()
        scale = self.last_start_scale = self.start_scale(stack, centre_level, lone=alone)
        own = getattr(self.net, "sigmas", None)  # a BlurSkip start's; None: no blur start
        sigmas = self.lone_blur if alone and self.neighbours and self.lone_blur else own
        was_training = self.net.training
        self.net.eval()
        try:
            changed = sigmas != own or scale < 1
            with self.net.blurring(*(scale * sigma for sigma in sigmas)) if changed else contextlib.nullcontext():
                return np.clip(at_lateral_scale(at_scale, stack, self.lateral_bin), 0, 1)
        finally:
            self.net.train(was_training)


# ---------------------------------------------------------------- other training methods (trainers.py, --method)
#
# Every method hands evaluate.py / denoise.py one module with the same contract as a TCFL
# generator: noisy (N, 1, H, W) -> its estimated noise, so the denoised image is x - module(x).
# build_denoiser() rebuilds that module from a checkpoint's method, backbone and args.


class R2RDenoiser(nn.Module):
    """R2R at test time: noise = x - mean_k f(x + alpha * z_k), f(v) = v - net(v), z_k ~ N(0, sigma^2 K K^T).

    sigma and the correlation kernel K are buffers (estimated from the training data by the
    trainer, saved with the weights). The recorruptions are drawn from a generator seeded
    with `seed` on every call, so the same image always gives the same output. Tiles of
    predict_noise draw their own recorruptions, so a tiled result differs from the untiled
    one by the averaging's residual (evaluate.py --tile 1024 keeps a 450 x 900 scan whole).
    """

    def __init__(self, net, alpha=0.5, passes=8, seed=0, kernel_size=7):
        super().__init__()
        self.net, self.alpha, self.passes, self.seed = net, alpha, passes, seed
        self.register_buffer("sigma", torch.tensor(0.15))
        kernel = torch.zeros(1, 1, kernel_size, kernel_size)
        kernel[..., kernel_size // 2, kernel_size // 2] = 1.0  # white noise until the trainer measures the speckle
        self.register_buffer("kernel", kernel)

    def sample_noise(self, shape, generator=None, device=None):
        """z ~ N(0, sigma^2 K K^T) of `shape`: white noise through the kernel ('valid', so no border effect)."""
        k = self.kernel.shape[-1]
        white = torch.randn(shape[0], 1, shape[-2] + k - 1, shape[-1] + k - 1, generator=generator,
                            device=device if device is not None else self.kernel.device)
        return self.sigma * F.conv2d(white.to(self.kernel.device), self.kernel)

    def forward(self, x):
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        total = torch.zeros_like(x)
        for _ in range(self.passes):
            z = self.alpha * self.sample_noise(x.shape, generator, x.device)
            # x - f(x + a z) = x - (x + a z - net(x + a z)) = net(x + a z) - a z
            total += self.net(x + z) - z
        return total / self.passes


class CNCLNet(nn.Module):
    """CNCL: a content branch (x -> clean) and a noise branch (x -> noise), fused by a 1x1 conv
    of [content, x - noise]; forward returns the noise estimate x - fused."""

    def __init__(self, backbone="unet"):
        super().__init__()
        self.content, self.noise = build_generator(backbone), build_generator(backbone)
        self.fuse = nn.Conv2d(2, 1, 1)
        with torch.no_grad():  # start as the plain average of the two estimates, not as ~0 (N(0, 0.02) init)
            self.fuse.weight.fill_(0.5)
            self.fuse.bias.zero_()

    def branches(self, x):
        content, noise = self.content(x), self.noise(x)
        return content, noise, self.fuse(torch.cat([content, x - noise], dim=1))

    def forward(self, x):
        return x - self.branches(x)[2]


class ConditionalPatchGAN(PatchGAN):
    """The PatchGAN judging an (input, output) pair stacked as channels (pix2pix / CNCL)."""

    def __init__(self, features=64, in_channels=2):
        super().__init__(features)
        self.body[0] = nn.Conv2d(in_channels, features, 4, stride=2, padding=1)


def _leaky_conv(in_channels, out_channels, kernel=3, stride=1):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, padding=(kernel - 1) // 2 if stride == 1 else 1),
                         nn.LeakyReLU(0.2, inplace=True))


class ResBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(_leaky_conv(channels, channels), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class DRGANContentEncoder(nn.Module):
    """Content code at three scales (H, H/2, H/4). No normalisation layers: DRGAN pushes noisy,
    clean and generated images through the same encoder, and per-batch (BN) or per-crop (IN)
    statistics would differ between training crops and whole test B-scans."""

    def __init__(self, features=32):
        f = features
        super().__init__()
        self.stem = _leaky_conv(1, f)
        self.down1 = _leaky_conv(f, 2 * f, 4, stride=2)
        self.down2 = nn.Sequential(_leaky_conv(2 * f, 4 * f, 4, stride=2), ResBlock(4 * f))

    def forward(self, x):
        s1 = self.stem(x)
        s2 = self.down1(s1)
        return [s1, s2, self.down2(s2)]


class DRGANNoiseEncoder(nn.Module):
    """Noise code: one vector per image (global average), speckle statistics being stationary."""

    def __init__(self, features=32, code=8):
        f = features
        super().__init__()
        self.body = nn.Sequential(_leaky_conv(1, f), _leaky_conv(f, 2 * f, 4, stride=2), _leaky_conv(2 * f, 2 * f, 4, stride=2),
                                  nn.AdaptiveAvgPool2d(1), nn.Conv2d(2 * f, code, 1))

    def forward(self, x):
        return self.body(x)


class DRGANDecoder(nn.Module):
    """Content code (+ a noise code broadcast over the coarsest scale) -> image, UNet-style."""

    def __init__(self, features=32, code=0):
        f = features
        super().__init__()
        self.bottom = nn.Sequential(nn.Conv2d(4 * f + code, 4 * f, 1), ResBlock(4 * f))
        self.up1 = nn.Sequential(nn.Upsample(scale_factor=2), _leaky_conv(4 * f, 2 * f))
        self.merge1 = _leaky_conv(4 * f, 2 * f)
        self.up2 = nn.Sequential(nn.Upsample(scale_factor=2), _leaky_conv(2 * f, f))
        self.merge2 = _leaky_conv(2 * f, f)
        self.out = nn.Conv2d(f, 1, 3, padding=1)

    def forward(self, content, code=None):
        s1, s2, s3 = content
        if code is not None:
            s3 = torch.cat([s3, code.expand(-1, -1, *s3.shape[-2:])], dim=1)
        y = self.merge1(torch.cat([self.up1(self.bottom(s3)), s2], dim=1))
        y = self.merge2(torch.cat([self.up2(y), s1], dim=1))
        return self.out(y)


def init_drgan(module):
    """He init for the norm-free DRGAN nets: N(0, 0.02) would shrink the signal layer by layer."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, a=0.2, nonlinearity="leaky_relu")
        nn.init.zeros_(module.bias)


class DRGANDenoiser(nn.Module):
    """DRGAN's inference path: noise = x - clean_decoder(content_encoder(x))."""

    stride = 4

    def __init__(self, features=32):
        super().__init__()
        self.content = DRGANContentEncoder(features)
        self.clean_decoder = DRGANDecoder(features)

    def forward(self, x):
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.stride, -width % self.stride
        y = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else x
        return x - self.clean_decoder(self.content(y))[..., :height, :width]


class DRGAN(nn.Module):
    """All of DRGAN's generator side in one module (one forward per step, as DDP wants).

    X noisy, Y clean (unpaired). E_C content encoder, E_N noise encoder, G_C clean decoder,
    G_N noisy decoder (content + noise code):
        clean_x = G_C(E_C(X)),               noisy_y = G_N(E_C(Y), E_N(X))
        recon_x = G_N(E_C(X), E_N(X)),       recon_y = G_C(E_C(Y))
        cycle_x = G_N(E_C(clean_x), E_N(noisy_y)), cycle_y = G_C(E_C(noisy_y))
    """

    def __init__(self, features=32, code=8):
        super().__init__()
        self.denoiser = DRGANDenoiser(features)
        self.noise_encoder = DRGANNoiseEncoder(features, code)
        self.noisy_decoder = DRGANDecoder(features, code)
        self.apply(init_drgan)

    def forward(self, noisy, clean):
        encode, clean_decoder = self.denoiser.content, self.denoiser.clean_decoder
        n = len(noisy)
        content = encode(torch.cat([noisy, clean]))
        content_x, content_y = [c[:n] for c in content], [c[n:] for c in content]
        code_x = self.noise_encoder(noisy)
        clean_x, recon_y = clean_decoder(content).split(n)
        noisy_y, recon_x = self.noisy_decoder([torch.cat([cy, cx]) for cy, cx in zip(content_y, content_x)],
                                              torch.cat([code_x, code_x])).split(n)
        content2 = encode(torch.cat([clean_x, noisy_y]))
        cycle_y = clean_decoder([c[n:] for c in content2])
        cycle_x = self.noisy_decoder([c[:n] for c in content2], self.noise_encoder(noisy_y))
        return {"clean_x": clean_x, "noisy_y": noisy_y, "recon_x": recon_x, "recon_y": recon_y,
                "cycle_x": cycle_x, "cycle_y": cycle_y}


METHODS = ("tcfl", "r2r", "n2n", "cncl", "drgan")


def build_denoiser(method, backbone, args=None):
    """The (untrained) inference module of a method: noisy -> noise, as a TCFL generator.

    args: the run's options as a dict (a checkpoint's "args"); only the method's own are read.
    """
    args = args or {}
    if method == "tcfl":
        return build_generator(backbone, in_channels=1 + args.get("neighbours", 0),
                               skip_blur=args.get("skip_blur") or (0.0, 0.0), skip_nlm=args.get("skip_nlm", 0.0),
                               skip_centre_weight=args.get("skip_centre_weight", 1.0), skip_bm3d=args.get("skip_bm3d", 0.0),
                               skip_blur_share=args.get("skip_blur_share", 0.0),
                               skip_bm3d_profile=args.get("skip_bm3d_profile", "hard"))
    if method == "n2n":
        return build_generator(backbone)
    if method == "r2r":
        return R2RDenoiser(build_generator(backbone), alpha=args.get("r2r_alpha", 0.5),
                           passes=args.get("r2r_passes", 8), seed=args.get("seed", 0))
    if method == "cncl":
        return CNCLNet(backbone)
    if method == "drgan":  # its own encoder/decoder: --backbone does not apply
        model = DRGANDenoiser()
        model.apply(init_drgan)
        return model
    raise ValueError(f"unknown method {method} (choose from {', '.join(METHODS)})")


class Discriminators(nn.ModuleDict):
    """Several PatchGANs called as one module (one DDP forward per step): {name: images} -> {name: scores}."""

    def __init__(self, names):
        super().__init__({name: build_discriminator() for name in names})

    def forward(self, batches):
        return {name: self[name](images) for name, images in batches.items()}


# ---------------------------------------------------------------- checkpoints

def inference_settings(state):
    """{"lateral_bin", "zero_mean", "neighbours"[, "noise_sigma", "quiet_sigma", "lone_blur"]} a checkpoint denoises with: what train.py
    recorded, or for checkpoints written before it recorded them, what its options imply (only TCFL trains
    zero-mean or with neighbours)."""
    args = state.get("args") or {}
    neighbours = int(args.get("neighbours", 0)) if state.get("method", "tcfl") == "tcfl" else 0
    if "inference" in state:
        return {"neighbours": neighbours, **state["inference"]}
    return {"lateral_bin": int(args.get("lateral_bin", 1)), "neighbours": neighbours,
            "zero_mean": state.get("method", "tcfl") == "tcfl" and bool(args.get("zero_mean", False))}


def fold_batchnorm(net):
    """For inference: every BatchNorm that directly follows a convolution in a Sequential is
    folded into that convolution's weights and bias (torch's fuse_conv_bn_eval) and dropped.
    Same output to float rounding, one pass over the activations less per layer."""
    for module in net.modules():
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                conv, norm = module[i], module[i + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    module[i], module[i + 1] = fuse_conv_bn_eval(conv.eval(), norm.eval()), nn.Identity()
    return net


def load_checkpoint(path, device="cpu", fold_bn=True):
    """(Denoiser, checkpoint dict) of train.py's epoch_N.pth or a shipped generator-only file.

    The EMA weights are used when saved, with BatchNorm folded into the convolutions (fold_bn). On
    CPU the network runs in channels_last: oneDNN's convolutions are faster that way (bench/infer_speed.py).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise DataError(f"{path}: not a readable checkpoint ({type(error).__name__}: {str(error).splitlines()[0]})") from None
    if not isinstance(state, dict) or "generator" not in state or "backbone" not in state:
        raise DataError(f"{path}: not a checkpoint of this project (no generator/backbone entries)")
    if state["backbone"] not in GENERATORS:
        raise DataError(f"{path}: unknown backbone '{state['backbone']}'")
    method = state.get("method", "tcfl")
    if method not in METHODS:
        raise DataError(f"{path}: unknown training method '{method}' (known: {', '.join(METHODS)})")
    net = build_denoiser(method, state["backbone"], state.get("args") or {})
    try:
        net.load_state_dict(state.get("generator_ema") or state["generator"])
    except RuntimeError as error:
        lines = str(error).splitlines()
        raise DataError(f"{path}: weights do not fit a {method} ({state['backbone']}) generator "
                        f"({lines[1].strip() if len(lines) > 1 else error})") from None
    net = net.to(device).eval()
    if fold_bn:
        net = fold_batchnorm(net)
    if torch.device(device).type == "cpu":
        net = net.to(memory_format=torch.channels_last)
    return Denoiser(net, **inference_settings(state)), state


def export_checkpoint(path, out, lateral_bin=None, lone_blur=None):
    """Write the inference weights of a training checkpoint as a small shippable file.
    lateral_bin: the binning it denoises with from now on (chosen on validation), if not the training one;
    lone_blur: the start it takes for a lone B-scan (Denoiser), if not its own."""
    denoiser, state = load_checkpoint(path)
    keep = {k: state[k] for k in ("method", "backbone", "args", "epoch", "step", "history") if k in state}
    inference = {**inference_settings(state), **({"lateral_bin": check_lateral_bin(lateral_bin)} if lateral_bin else {})}
    if lone_blur is not None:
        inference["lone_blur"] = list(denoiser.replace(lone_blur=lone_blur).lone_blur)
    torch.save({**keep, "inference": inference, "generator": state.get("generator_ema") or state["generator"],
                "source": state.get("source", Path(path).name)}, out)
    print(f"wrote {out} ({Path(out).stat().st_size / 1e6:.1f} MB): {keep.get('method', 'tcfl')} / {keep['backbone']}, "
          f"epoch {keep.get('epoch')}, step {keep.get('step')}, denoising {inference['lateral_bin']}:1 laterally")


def epoch_arg(value):
    """--epoch N, or --epoch best: the epoch with the highest validation PSNR."""
    if value == "best":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an epoch number or 'best', got '{value}'") from None


def best_epoch(ckpt_dir):
    """The epoch whose validation PSNR (held-back training images, never the test split) is highest."""
    log = Path(ckpt_dir) / "log.csv"
    if not log.is_file():
        raise DataError(f"{log}: no training log, so no validation scores to pick the best epoch from")
    with open(log) as f:
        scored = [(float(r["val_psnr"]), int(r["epoch"])) for r in csv.DictReader(f) if r.get("val_psnr")]
    if not scored:
        raise DataError(f"{log}: no validation PSNR recorded (trained without validation images?)")
    value, epoch = max(scored)
    print(f"best validation PSNR {value:.2f} dB at epoch {epoch} ({log})")
    return epoch


def checkpoint_path(ckpt, epoch, ckpt_dir):
    """--ckpt PATH, or --epoch N (or best) inside --ckpt_dir, with the available epochs named when missing."""
    if ckpt:
        return Path(ckpt)
    epoch = best_epoch(ckpt_dir) if epoch == "best" else epoch
    path = Path(ckpt_dir) / f"epoch_{epoch}.pth"
    if not path.is_file():
        epochs = sorted(int(p.stem.split("_")[1]) for p in Path(ckpt_dir).glob("epoch_*.pth") if p.stem.split("_")[1].isdigit())
        available = f"available epochs: {', '.join(map(str, epochs))}" if epochs else "no epoch_N.pth there (train first)"
        raise DataError(f"{path}: checkpoint not found; {available}")
    return path


def add_checkpoint_args(parser):
    """The options of the scripts that denoise with a checkpoint (evaluate.py, denoise.py)."""
    parser.add_argument("--epoch", type=epoch_arg, default=None,
                        help="evaluate <ckpt_dir>/epoch_N.pth; 'best': the best validation epoch")
    parser.add_argument("--ckpt", default=None, help="evaluate this checkpoint file")
    parser.add_argument("--ckpt_dir", default="ckpt")
    parser.add_argument("--ensemble", nargs="?", const="lr", default=None, choices=list(ENSEMBLES),
                        help="average flipped passes: 'lr' (the default with a bare --ensemble): the B-scan and its "
                             "left-right mirror, the only flip training uses; 'all': the 8 flips/rotations")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="bf16: bfloat16 autocast; auto: bf16 where the hardware computes in it, else fp32")
    parser.add_argument("--tile", type=int, default=512, help="tile size for large images (bounded memory)")
    parser.add_argument("--lateral_bin", type=int, default=None,
                        help="denoise B-scans binned N:1 laterally (default: as the checkpoint was trained, train.py --lateral_bin)")
    parser.add_argument("--lone_blur", type=float, nargs=2, default=None, metavar=("AXIAL", "LATERAL"),
                        help="a --neighbours --skip_blur checkpoint starts a lone B-scan (no neighbours) from a Gaussian "
                             "of these sigmas, binned pixels (default: as the checkpoint records)")
    parser.add_argument("--noise_adapt", action=argparse.BooleanOptionalAction, default=True,
                        help="compress the contrast of a B-scan noisier than the training scans to their noise level "
                             "before the net, and expand the noise estimate back; for a scan quieter than them, narrow a "
                             "--skip_blur start's Gaussian (needs the noise level train.py records)")


def load_for_options(args, path):
    """(Denoiser, checkpoint) of path with add_checkpoint_args' inference settings (--lateral_bin overrides the checkpoint's)."""
    device = resolve_device(args.device)
    denoiser, state = load_checkpoint(path, device)
    settings = {"ensemble": args.ensemble, "tile": args.tile, "bf16": use_bf16(args.precision, device),
                "lateral_bin": denoiser.lateral_bin if args.lateral_bin is None else args.lateral_bin,
                "noise_sigma": denoiser.noise_sigma if args.noise_adapt else None,
                "lone_blur": denoiser.lone_blur if args.lone_blur is None else args.lone_blur}
    return denoiser.replace(**settings), state
