"""Generators (noise predictors) and the PatchGAN discriminator.

Every generator maps a noisy B-scan x (N, 1, H, W) to its estimated noise n, so the
denoised image is x - G(x), as in TCFL. Pick one with --backbone; GENERATORS maps
the name to the class.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


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

    def __init__(self, depth=10, features=64):
        super().__init__()
        layers = [nn.Conv2d(1, features, 3, padding=1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
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

    def __init__(self, features=32):
        super().__init__()
        f = features
        self.down = nn.ModuleList([conv_block(1, f), conv_block(f, 2 * f), conv_block(2 * f, 4 * f)])
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

    def __init__(self, blocks=4, growth=16, layers_per_block=4, features=64):
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(1, features, 3, padding=1), nn.ReLU(inplace=True))
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


def build_generator(backbone):
    if backbone not in GENERATORS:
        raise ValueError(f"unknown --backbone {backbone} (choose from {', '.join(GENERATORS)})")
    model = GENERATORS[backbone]()
    model.apply(init_weights)
    return model


def build_discriminator():
    model = PatchGAN()
    model.apply(init_weights)
    return model


@torch.no_grad()
def predict_noise(generator, image, tile=512, margin=32, bf16=False):
    """G(image) for a (1, 1, H, W) tensor, in overlapping tiles when the image is large.

    Each tile is computed with `margin` extra pixels of context on every side and only
    its centre is kept: beyond the generator's receptive field (21 px for DnCNN) the
    result equals the untiled one, and memory stays bounded for any B-scan size.
    """
    height, width = image.shape[-2:]
    autocast = torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=bf16)
    if height <= tile + 2 * margin and width <= tile + 2 * margin:
        with autocast:
            return generator(image).float()
    noise = torch.empty_like(image)
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            t0, l0 = max(top - margin, 0), max(left - margin, 0)
            t1, l1 = min(top + tile + margin, height), min(left + tile + margin, width)
            with autocast:
                out = generator(image[..., t0:t1, l0:l1]).float()
            bottom, right = min(top + tile, height), min(left + tile, width)
            noise[..., top:bottom, left:right] = out[..., top - t0:bottom - t0, left - l0:right - l0]
    return noise


DIHEDRAL = [(k, flip) for flip in (False, True) for k in range(4)]


@torch.no_grad()
def denoise_array(generator, image, device="cpu", ensemble=False, bf16=False, tile=512):
    """clip(x - G(x), 0, 1) for a 2-D float image; --ensemble averages the 8 flips/rotations."""
    x = torch.from_numpy(image)[None, None].to(device)
    if not ensemble:
        return (x - predict_noise(generator, x, tile, bf16=bf16)).clamp(0, 1)[0, 0].cpu().numpy()
    total = torch.zeros_like(x)
    for k, flip in DIHEDRAL:
        view = torch.rot90(x.flip(-1) if flip else x, k, (-2, -1))
        out = torch.rot90(view - predict_noise(generator, view, tile, bf16=bf16), -k, (-2, -1))
        total += out.flip(-1) if flip else out
    return (total / len(DIHEDRAL)).clamp(0, 1)[0, 0].cpu().numpy()
