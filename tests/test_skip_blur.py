"""train.py --skip_blur: a TCFL generator that starts as the blur floor (models.BlurSkip)."""
import numpy as np
import pytest
import torch
from scipy import ndimage

import evaluate
import models
import train
from utils import DataError


def blurred(image, sigmas):
    """The reference: scipy's Gaussian, borders replicated ("nearest"), truncated at 3 sigma like BlurSkip's taps."""
    return ndimage.gaussian_filter(image, sigmas, mode="nearest", truncate=3.0)


@pytest.mark.parametrize("backbone", list(models.GENERATORS))
def test_a_new_blur_skip_generator_denoises_as_the_gaussian_blur(backbone):
    torch.manual_seed(0)
    net = models.build_generator(backbone, skip_blur=(1.0, 3.0)).eval()
    x = torch.rand(1, 1, 24, 40)
    with torch.no_grad():
        denoised = (x - net(x))[0, 0].numpy()
    np.testing.assert_allclose(denoised, blurred(x[0, 0].numpy(), (1.0, 3.0)), atol=1e-5)


def test_the_blur_reads_the_b_scan_only_and_a_zero_sigma_leaves_an_axis_alone():
    torch.manual_seed(0)
    net = models.build_generator("dncnn", in_channels=3, skip_blur=(0.0, 2.0)).eval()
    x = torch.rand(1, 3, 16, 30)
    with torch.no_grad():
        denoised = x[:, :1] - net(x)
        x[:, 1:] = torch.rand(1, 2, 16, 30)  # other neighbours: same output
        torch.testing.assert_close(x[:, :1] - net(x), denoised)
    np.testing.assert_allclose(denoised[0, 0].numpy(), blurred(x[0, 0].numpy(), (0.0, 2.0)), atol=1e-5)


def test_the_correction_trains_and_the_checkpoint_rebuilds_the_blur(tmp_path):
    ckpt = tmp_path / "ckpt"
    train.main(["--patch_size", "32", "--batch_size", "2", "--epoch_size", "4", "--niter", "1", "--n_val", "1",
                "--skip_blur", "1", "2", "--ckpt_dir", str(ckpt), "--img_dir", str(tmp_path / "img")])
    state = torch.load(ckpt / "epoch_1.pth", weights_only=True)
    assert state["args"]["skip_blur"] == [1.0, 2.0]
    assert state["generator"]["net.body.9.weight"].abs().max() > 0  # the zero-initialised last layer has learned
    exported = tmp_path / "G.pth"
    evaluate.main(["--ckpt", str(ckpt / "epoch_1.pth"), "--export", str(exported)])
    denoiser = models.load_checkpoint(exported)[0]
    assert isinstance(denoiser.net, models.BlurSkip)
    assert denoiser.net.taps_axial.numel() == 7 and denoiser.net.taps_lateral.numel() == 13  # 3 sigma each side
    # The loaded generator is the trained one: the same weights in a fresh BlurSkip give the same noise.
    fresh = models.build_generator("dncnn", skip_blur=(1.0, 2.0))
    fresh.load_state_dict(state["generator_ema"])
    x = torch.rand(1, 1, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(denoiser.net(x.contiguous(memory_format=torch.channels_last)), fresh.eval()(x),
                                   atol=1e-5, rtol=1e-4)


def test_skip_blur_options_are_checked():
    with pytest.raises(DataError, match="does not read --skip_blur"):
        train.parse_args(["--method", "cncl", "--skip_blur", "1", "2"])
    with pytest.raises(DataError, match="--skip_blur needs sigmas >= 0, got -1.0 2.0"):
        train.parse_args(["--skip_blur", "-1", "2"])
