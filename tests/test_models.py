"""models.py: the backbones keep any input size, the published DnCNN and PatchGAN shapes, tiled inference
equals untiled, the test-time ensembles."""
import pytest
import torch

import models


@pytest.mark.parametrize("backbone", list(models.GENERATORS))
@pytest.mark.parametrize("size", [(37, 50), (64, 64)])
def test_generators_keep_any_input_size(backbone, size):
    generator = models.build_generator(backbone).eval()
    x = torch.rand(2, 1, *size)
    with torch.no_grad():
        assert generator(x).shape == x.shape


def test_dncnn_is_the_published_one():
    convs = [m for m in models.DnCNN().modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in models.DnCNN().modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == 10 and len(norms) == 8
    assert all(c.kernel_size == (3, 3) for c in convs) and convs[0].bias is None and convs[1].out_channels == 64


def test_patchgan_output_is_one_sixteenth():
    assert models.build_discriminator()(torch.rand(1, 1, 640, 640)).shape == (1, 1, 40, 40)
    assert models.build_discriminator()(torch.rand(3, 1, 128, 96)).shape == (3, 1, 8, 6)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown --backbone"):
        models.build_generator("resnet")


def test_tiled_equals_untiled():
    torch.manual_seed(0)
    generator = models.DnCNN().eval()
    with torch.no_grad():  # outputs of order 1, so 1e-4 is a meaningful tolerance
        generator.body[-1].weight.mul_(1e4)
    x = torch.rand(1, 1, 150, 170)
    whole = models.predict_noise(generator, x, tile=1000)
    tiled = models.predict_noise(generator, x, tile=48, margin=24)
    assert whole.abs().mean() > 1e-2 and (whole - tiled).abs().max() < 1e-4
    assert (whole - models.predict_noise(generator, x, tile=48, margin=2)).abs().max() > 1e-3  # margin matters


def test_ensemble_of_identity_noise_is_exact():
    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)
    image = torch.rand(20, 30).numpy()
    for ensemble in models.ENSEMBLES:
        out = models.Denoiser(Zero(), ensemble=ensemble)(image)
        assert out.shape == image.shape and abs(out - image).max() < 1e-6


def test_lr_ensemble_keeps_the_bscan_upright():
    """'lr' averages the B-scan and its left-right mirror only; 'all' also turns it upside down."""
    seen = []

    class Record(torch.nn.Module):
        def forward(self, x):
            seen.append(x[0, 0].clone())
            return torch.zeros_like(x)
    image = torch.rand(20, 30)
    models.Denoiser(Record(), ensemble="lr")(image.numpy())
    assert len(seen) == 2 and torch.equal(seen[0], image) and torch.equal(seen[1], image.flip(-1))
    seen.clear()
    models.Denoiser(Record(), ensemble="all")(image.numpy())
    assert len(seen) == 8 and any(torch.equal(view, image.flip(-2)) for view in seen)
