"""models.py: the backbones keep any input size, the published DnCNN and PatchGAN shapes, tiled inference
equals untiled, the test-time ensembles."""
from pathlib import Path

import numpy as np
import pytest
import torch

import models
import utils

ROOT = Path(__file__).resolve().parents[1]
DUKE = ROOT.parent / "shared" / "data" / "duke_bioptigen"


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


@pytest.mark.parametrize("backbone", ["dncnn", "unet"])
def test_loaded_checkpoint_runs_with_batchnorm_folded_and_matches_the_unfolded_net(tmp_path, backbone):
    """load_checkpoint folds every BatchNorm into its convolution; an exported file loads with
    weights_only=True and denoises as the unfolded network in eval mode does."""
    torch.manual_seed(0)
    net = models.build_generator(backbone)
    for module in net.modules():  # trained-looking statistics, so that folding changes the weights
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2), module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5), module.bias.data.uniform_(-0.1, 0.1)
    train_ckpt, shipped = tmp_path / "epoch_1.pth", tmp_path / "G.pth"
    torch.save({"generator": net.state_dict(), "backbone": backbone, "method": "tcfl", "args": {}}, train_ckpt)
    models.export_checkpoint(train_ckpt, shipped)
    assert "generator" in torch.load(shipped, weights_only=True)
    denoiser, _ = models.load_checkpoint(shipped)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in denoiser.net.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in models.load_checkpoint(shipped, fold_bn=False)[0].net.modules())
    image = torch.rand(1, 1, 40, 72)
    with torch.no_grad():
        torch.testing.assert_close(denoiser.net(image), net.eval()(image), rtol=1e-4, atol=1e-5)


def speckled(shape=(96, 80), seed=0):
    """Mid-grey speckle-like image, well inside (0, 1) so no output is clipped."""
    rng = np.random.default_rng(seed)
    return (0.5 + 0.05 * rng.standard_normal(shape)).astype(np.float32)


def test_noise_adapt_sees_a_noisier_bscan_at_the_training_contrast():
    # A B-scan at the training noise level goes through unchanged (gain 1). The same B-scan with its
    # contrast expanded 1.5x about its mean is 1.5x as noisy: the net must see the original B-scan
    # and its noise estimate come back 1.5x, so the output is the original's output expanded alike.
    torch.manual_seed(0)
    net = models.DnCNN().eval()
    with torch.no_grad():
        net.body[-1].weight.mul_(1e3)  # a noise map of order 0.01-0.1, not ~0
    image = speckled()
    plain = models.Denoiser(net, zero_mean=True)
    adapting = models.Denoiser(net, zero_mean=True, noise_sigma=utils.noise_sigma(image))
    np.testing.assert_array_equal(adapting(image), plain(image))
    assert adapting.last_gain == 1.0
    mean = image.mean()
    noisier = (mean + 1.5 * (image - mean)).astype(np.float32)
    expected = mean + 1.5 * (plain(image) - mean)
    assert np.abs(plain(noisier) - expected).max() > 1e-2  # without adapting the net sees other speckle
    np.testing.assert_allclose(adapting(noisier), expected, atol=2e-5)
    assert adapting.last_gain == pytest.approx(1 / 1.5, rel=1e-3)
    quieter = (mean + 0.5 * (image - mean)).astype(np.float32)
    np.testing.assert_array_equal(adapting(quieter), plain(quieter))  # quieter: unchanged


def test_noise_adapt_estimates_at_the_binning_the_levels_were_recorded_at():
    # Speckle correlated over 4 A-scans is nearly invisible to the wavelet estimate at full size but not once
    # binned 4:1, the scale a 4:1 net denoises at: recorded at noise_bin 4, the training level of fine speckle
    # (binned alike) is below this B-scan's, so it is compressed; a checkpoint recorded at full size
    # (noise_bin 1, all before it was recorded) compares full-size estimates and sees it as quieter.
    import cv2
    rng = np.random.default_rng(0)
    fine = (0.5 + 0.05 * rng.standard_normal((64, 256))).astype(np.float32)
    coarse = (0.5 + 0.1 * cv2.resize(rng.standard_normal((64, 64)).astype(np.float32), (256, 64),
                                     interpolation=cv2.INTER_NEAREST)).astype(np.float32)
    assert utils.noise_sigma(coarse) < utils.noise_sigma(fine)
    net = models.DnCNN().eval()
    at_full = models.Denoiser(net, lateral_bin=4, zero_mean=True, noise_sigma=utils.noise_sigma(fine))
    at_bin = at_full.replace(noise_sigma=utils.noise_sigma(utils.bin_laterally(fine, 4)), noise_bin=4)
    at_full(coarse)
    at_bin(coarse)
    assert at_full.last_gain == 1.0
    binned = utils.noise_sigma(utils.bin_laterally(coarse, 4))
    assert at_bin.last_gain == pytest.approx(at_bin.noise_sigma / binned, rel=1e-6) and at_bin.last_gain < 0.7
    assert at_bin.replace(noise_bin=1).noise_bin == 1 and models.Denoiser(net).noise_bin == 1


@pytest.mark.parametrize("start, lone_is_compressed", [({"skip_nlm": 12}, True), ({"skip_bm3d": 2.5}, True),
                                                         ({"skip_blur": (1.0, 3.0)}, False)])
def test_a_lone_bscan_meets_a_numpy_filter_start_at_the_blends_noise_level(start, lone_is_compressed):
    # Trained on the blend of 5 B-scans (noise x blend_noise), an NLM or BM3D start sees a lone B-scan's
    # contrast compressed by blend_noise, whatever its level; a blur start is linear: gain 1 here.
    torch.manual_seed(0)
    net = models.build_generator("dncnn", in_channels=5, skip_centre_weight=0.6, **start).eval()
    image = speckled()
    level = utils.noise_sigma(image)
    denoiser = models.Denoiser(net, zero_mean=True, noise_sigma=level, neighbours=4)
    seen = []
    real = denoiser.denoise_tensor
    denoiser.denoise_tensor = lambda x, gain=1.0: seen.append(gain) or real(x, gain)
    denoiser(image)
    blend = net.blend_noise(4)
    assert blend == pytest.approx(np.sqrt(0.6 ** 2 + 0.4 ** 2 / 4))
    assert seen[-1] == pytest.approx(blend if lone_is_compressed else 1.0, rel=1e-6)
    assert denoiser.last_gain == 1.0  # at the training level: no noise adaptation to report
    denoiser(np.stack([image] * 3 + [speckled(seed=1)] * 2))  # with neighbours: the training level
    assert seen[-1] == 1.0
    for noise_sigma in (4 * level, None):  # a lone B-scan 4x quieter than the training scans, or no noise_adapt
        quiet = denoiser.replace(noise_sigma=noise_sigma)
        quiet.denoise_tensor = lambda x, gain=1.0: seen.append(gain) or real(x, gain)
        quiet(image)
        assert seen[-1] == pytest.approx(blend if lone_is_compressed else 1.0, rel=1e-6)  # still its own blend


@pytest.mark.skipif(not DUKE.is_dir(), reason="needs ../shared/data/duke_bioptigen (the real Duke scans)")
def test_shipped_checkpoint_records_its_training_scans_noise_level():
    import datasets
    denoiser, state = models.load_checkpoint(ROOT / "ckpt" / "tcfl_duke28_G.pth")
    args = state["args"]
    noisy = datasets.load_unpaired(args["dataset"], DUKE, args["split"], args["n_val"], seed=args["seed"])[0]
    levels = [utils.noise_sigma(utils.bin_laterally(x, 4)) for x in noisy]  # binned 4:1, as train.py records it
    assert len(noisy) == 40 and denoiser.noise_bin == 4 and denoiser.noise_sigma == pytest.approx(np.median(levels), rel=1e-6)
    assert denoiser.quiet_sigma == pytest.approx(min(levels), rel=1e-6)
    # trained and denoising binned 4:1, reading 4 neighbours, starting from the mean of NLM and both-stage BM3D
    # (low-complexity profile) + 0.2 x the blur, all of the blend
    assert args["lateral_bin"] == 4 and denoiser.lateral_bin == 4
    net = denoiser.net
    assert isinstance(net, models.NLMBM3DSkip) and (net.h, net.sigma_factor, net.profile) == (12.0, 2.5, "lc")
    assert net.blur_share == 0.2
    assert denoiser.neighbours == 4 and args["skip_centre_weight"] == 0.6


def test_denoiser_replace_changes_only_what_it_is_told():
    net = models.build_generator("dncnn")
    base = models.Denoiser(net, lateral_bin=4, zero_mean=True, ensemble="lr", tile=64, bf16=False, noise_sigma=0.1,
                           neighbours=0)
    changed = base.replace(lateral_bin=8)
    assert changed.net is net and changed.lateral_bin == 8
    assert (changed.zero_mean, changed.ensemble, changed.tile, changed.noise_sigma) == (True, "lr", 64, 0.1)
